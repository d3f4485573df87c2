"""Palimpsest: a job service that rewrites deep generative models."""
