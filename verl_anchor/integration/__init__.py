"""Thin adapters between the pure core (`metrics`, `credit`, `capture`) and verl 0.9.1's v1 trainer."""
