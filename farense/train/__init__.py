"""The training engine under farense.trainer: setup, the resumable state, the loop, the finish."""
