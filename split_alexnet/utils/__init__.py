"""Small helpers every part uses: command-line errors, the atomic file writer, the checkpoint file
format, the signal handler, progress lines, PNG charts."""
