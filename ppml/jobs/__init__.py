"""A job's life, in one place: its schedule and charge rules, the runner that trains it, the
reaper that recovers it, its checkpoints and its receipt.

* ``schedule``: how a job's steps are counted and what a job stopped short is charged;
* ``runner``: a worker claims, trains, publishes and finishes a job;
* ``reaper``: jobs whose worker vanished are re-queued or settled;
* ``checkpoints``: training state kept between attempts;
* ``receipts``: the privacy receipt inside every model file;
* ``webhooks``: the signed event a job's ``webhook_url`` gets when it ends (an outbox).

Admission (pricing and reservation) lives in ``ppml.services``; it runs in the API.
Importing this package imports none of its modules (the API must not pull in the runner).
"""
