"""One router per noun: generate, models, sessions, health (and metrics), admin."""
