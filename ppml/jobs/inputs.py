"""What a job attempt reads: its dataset's arrays (sealed at rest), the rows that score it,
a public dataset's rows (a PATE student's) and the dataset's split secret."""

from __future__ import annotations

from typing import Any

import numpy as np

from ppml import datasets as data
from ppml.datasets.keys import open_secret
from ppml.datasets.statistics import DatasetStatistics
from ppml.db.models import Dataset
from ppml.db.repositories import Repositories
from ppml.db.session import Database
from ppml.errors import MalformedFile
from ppml.services.statistics import ensure_released
from ppml.storage import ArtifactStore
from ppml.trust.sealing import DataKeys, TamperedData

__all__ = ["JobInputs"]


class JobInputs:
    """Reads a worker's datasets from the store, opening what is sealed."""

    def __init__(self, db: Database, store: ArtifactStore, data_keys: DataKeys | None) -> None:
        self.db, self.store, self.data_keys = db, store, data_keys

    def arrays(self, dataset: Dataset) -> data.DatasetArrays:
        """The dataset's stored arrays (sealed at rest: decrypted for the read).

        Raises:
            MalformedFile: The file is missing, damaged or fails authentication.
            ppml.trust.sealing.UnknownKey: This worker lacks the key it was sealed with.
        """
        try:
            with self.store.open_plain(dataset.storage_key) as path:
                return data.load_arrays(path)
        except (FileNotFoundError, TamperedData):
            raise MalformedFile("the stored dataset is missing or damaged", field="file") from None

    def public_arrays(self, dataset_id: str) -> data.DatasetArrays:
        """A public dataset's arrays (a pate job's student reads its rows)."""
        with self.db.session() as session:
            public = Repositories(session).dataset_by_id(dataset_id)
        if public is None or public.epsilon_total is not None:
            raise MalformedFile("the student's dataset is gone or not public", field="file")
        return self.arrays(public)

    def scoring(self, dataset: Dataset, arrays: data.DatasetArrays) -> dict[str, Any]:
        """The rows that score the model: the owner's public validation set when the dataset
        has one (all its rows), else the held-out split, with each row's privacy unit."""
        if dataset.validation_dataset_id is None:
            units = arrays.clients_test if dataset.privacy_unit == "client" else None
            return {"x_test": arrays.x_test, "y_test": arrays.y_test, "test_units": units}
        with self.db.session() as session:
            public = Repositories(session).dataset_by_id(dataset.validation_dataset_id)
        assert public is not None and public.epsilon_total is None
        scoring = self.arrays(public)
        x = np.ascontiguousarray(np.concatenate([scoring.x_train, scoring.x_test]))
        y = np.concatenate([scoring.y_train, scoring.y_test])
        return {"x_test": x, "y_test": y, "test_units": None}

    def statistics(self, dataset: Dataset, x_train: np.ndarray | None = None) -> DatasetStatistics:
        """The dataset's released standardisation statistics, drawn from ``x_train`` (the
        training rows, as stored) by the first job that needs them.

        Raises:
            ppml.services.statistics.StatisticsMissing: none were charged.
        """

        def rows() -> np.ndarray:
            return self.arrays(dataset).x_train if x_train is None else x_train

        return ensure_released(self.db, dataset.id, rows)

    def secret(self, dataset: Dataset) -> str | None:
        """The dataset's split secret, opened (the key of its record-keyed partitions)."""
        return open_secret(self.data_keys, dataset.id, dataset.split_secret)
