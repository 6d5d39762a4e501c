"""The command line: one module per command, each exposing `add_parsers(subparsers)`; shared options in common.py."""
