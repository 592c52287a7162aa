"""Shared math of the locate-then-edit methods, written once: subject location and keys (``keys``), the target
optimiser (``targets``), least-squares solves (``solve``), second-moment statistics (``stats``), the layer-walking
driver of MEMIT/PMET/AlphaEdit/EMMET/BLUE (``walk``) and their shared config pieces (``config``), padding/device
helpers and the batch consistency check (``batching``), and the explicit :class:`~kedit.core.context.EditContext`."""
