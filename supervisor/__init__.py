"""Supervision: start, watch and restart psgrid processes, OTP style."""
