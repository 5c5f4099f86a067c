"""Reward workers: Ray actors that score samples with named verifiers. Imports only
rollout/'s data types."""
