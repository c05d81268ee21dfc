"""Public checkpoints -> deltafm: ``deltafm convert`` and ``deltafm mean-target``.

* :mod:`~deltafm.convert.reader`: read a ``torch.save`` file with the weights-only unpickler (no code runs);
* :mod:`~deltafm.convert.layouts`: the SiT / REPA / ΔFM-reference key maps and the exact weight transforms
  (time reversal, velocity sign, learn_sigma channels, position-code channel order);
* :mod:`~deltafm.convert.cli`: ``deltafm convert`` (writes a checkpoint folder ``deltafm sample`` loads);
* :mod:`~deltafm.convert.mean_target`: ``deltafm mean-target`` (ū estimated from data, as training keeps it).

See docs/CONVERT.md.
"""

from .layouts import LAYOUTS, convert_state_dict
from .reader import ConvertError, read_torch_file

__all__ = ["LAYOUTS", "ConvertError", "convert_state_dict", "read_torch_file"]
