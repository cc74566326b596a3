"""verl_anchor: attention-guided credit assignment for verl."""
