"""The parameter server: holds each job's parameters and applies pushed gradients."""
