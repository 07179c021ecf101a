"""Small helpers every part uses: command-line errors, the atomic file writer, progress lines, PNG charts."""
