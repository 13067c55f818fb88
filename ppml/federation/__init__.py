"""Remote data-owner nodes (#16), the pieces server, API and node share without torch:
the federation's schema (:mod:`.schema`), where rounds keep their files (:mod:`.keys`),
the task a node receives (:mod:`.tasks`), a node's sample-level privacy plan
(:mod:`.privacy`) and the checks of an uploaded update (:mod:`.updates`)."""
