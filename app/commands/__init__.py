"""Sub-commands of the ``hyperct`` CLI, one module each; heavy imports stay inside the commands."""
