"""The gateway: one OpenAI-compatible front for all arms that measures and
records every request. Above core/ only."""
