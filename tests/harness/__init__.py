"""Test harness: spawned local gloo jobs and the layout-parity runner (not shipped)."""
