"""Troupe's UI (Gradio) and command line. Never imports torch: everything heavy goes through engines.service."""
