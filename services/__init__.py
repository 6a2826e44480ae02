"""Baton's processes: the OpenAI gateway, the prefill and decode workers, and the launcher."""
