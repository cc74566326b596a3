"""Hydra recipes: `python -m verl.trainer.main_ppo --config-path=pkg://verl_anchor.recipes --config-name=NAME`."""
