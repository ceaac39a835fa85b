"""The ``m3-trt`` command line (``main`` gathers every stage's commands), the model commands
(``commands``: make-tiny, info, generate) and the end-to-end ``demo``: the top of the import flow.

May import anything in ``m3_trt``; nothing imports it. Importing the package itself imports nothing.
"""
