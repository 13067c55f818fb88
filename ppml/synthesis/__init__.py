"""DP synthetic data: the tabular view of a dataset (binning), MST (McKenna et al. 2021) on
``mbi``'s graphical models, and the quality report. Worker side: ``mbi`` and JAX are heavy,
so nothing here is imported by the API."""
