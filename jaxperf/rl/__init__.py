"""Reinforcement learning for MiniGo: the Go rules, tree search and
self-play, all as JAX programs."""
