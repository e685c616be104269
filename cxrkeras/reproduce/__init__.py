"""`cxrkeras reproduce`: the paper's grid of runs (Tables 2, 4, 5) as a resumable queue, and its tables.md."""

from cxrkeras.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "grid": "load_grid select_runs CLAIMS",
    "queue": "reproduce",
})
