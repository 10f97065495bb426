"""``python -m p2pnode`` runs the command line."""

from p2pnode.cli import main

main(prog_name="p2pnode")
