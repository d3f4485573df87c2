"""``python -m rewriting edit|stats|sample ...``: the engine's commands without the service."""
from rewriting.cli import main

main(prog_name="python -m rewriting")
