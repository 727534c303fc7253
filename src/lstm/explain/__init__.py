"""See what the tutorial teaches, measured on this library's layers: `lstm explain`.

One module per job:
  traces.py      recording_gates(model): the per-step gates of every recurrent layer; heat maps
  gate_table.py  the tutorial's input/forget gate table on a real LSTM with forced gates
  gradients.py   ‖∂L/∂h_t‖ against the distance from the loss, ‖∏J‖ against ρ^k, gradient clipping
  training.py    SimpleRNN / GRU / LSTM trained on adding or copy under one budget (cached)
  memory.py      the memory table: final test error against T, per cell
  runs.py        the gates of one input on a model trained by `lstm train`
  drawing.py     the LSTM cell diagram, drawn by code
  figures.py     matplotlib figures without pyplot (Agg on save), small PNGs
  sections.py    the report's parts: measure, draw, and describe with the measured numbers
  report.py      report.md and numbers.json
"""

from .traces import recording_gates, recurrent_layers

__all__ = ["recording_gates", "recurrent_layers"]
