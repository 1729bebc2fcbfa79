"""Importers for networks trained elsewhere (EDM / EDM2 network pickles), reading data only, never code."""

from ectune.importers.edm_pickle import (
    EdmPickle,
    PickleRefused,
    import_edm_pickle,
    load_edm_pickle,
    map_to_ectune,
    read_edm_pickle,
)

__all__ = ["EdmPickle", "PickleRefused", "import_edm_pickle", "load_edm_pickle", "map_to_ectune", "read_edm_pickle"]
