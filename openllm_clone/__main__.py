"""``python -m openllm_clone`` runs the CLI."""

from openllm_clone.cli import main

main()
