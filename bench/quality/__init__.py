"""Quality: the real suite's compression, interpolation and merging tables (``real_compression``,
``real_interpolation``, ``real_merging``), one NPS search timed (``nps_timing``), and the toy suites'
tables (``tables``)."""
