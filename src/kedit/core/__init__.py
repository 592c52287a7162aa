"""Shared math of the locate-then-edit methods: subject location and keys, the target optimiser, least-squares
solves, second-moment statistics, and the explicit :class:`~kedit.core.context.EditContext`."""
