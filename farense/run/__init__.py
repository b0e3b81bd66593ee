"""Run files and their stores."""
