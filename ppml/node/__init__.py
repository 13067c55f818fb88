"""A remote data-owner node of a federation (#16): ``ppml node run``.

The node holds its rows and never sends one. It connects out to the server's Node API
(``/v1/node/*``), checks its file against the federation's schema and reports only pass/fail
and its row count, keeps its own privacy ledger (ppml's schema on SQLite in its data
directory, charged with the service's ledger code), refuses what its budget cannot pay for,
and trains the rounds it is given with ppml's training engine (adding the DP noise itself at
sample level; clipping its update at client level).

Where things live: ``config`` (the data directory, ``node.json``), ``data`` (reading and the
schema check), ``ledger`` (the local ledger), ``tasks`` (a task as the server sends it),
``train`` (the local round), ``updates`` (safetensors in and out), ``client`` (HTTP with
backoff), ``runner`` (start and the task loop).

Imports torch (through ``train``); never imports ``api`` or ``worker``.
"""
