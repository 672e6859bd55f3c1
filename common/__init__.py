"""The ground every fedcbir package stands on: errors, atomic file writes, progress bars,
memory readings, certificates, Flower's environment, Markdown reports and the command-line
runner.  ``common`` imports nothing else of this project, so any package may import it."""

__version__ = "0.1.0"
