"""The models the demo, the analysis `--demo` runs and the tests use: tiny random decoders and tokenizers
(`tiny`), and the shipped Countdown policy (`policy`)."""
