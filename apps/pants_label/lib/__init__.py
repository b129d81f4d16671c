"""PanTS Label's server library, one subpackage per part (dependencies point down the list):

* :mod:`lib.core`: label map, settings, errors, atomic files; imports nothing of ours;
* :mod:`lib.imaging`: volume I/O, client-file decoding, DICOM series and SEG, case metadata;
* :mod:`lib.datastore`: the datastore protocol, the SQLite index, the PanTS and DICOMweb backends,
  label uploads, export and start-up recovery;
* :mod:`lib.model`: segmenter, training data, model store, metrics;
* :mod:`lib.infers`, :mod:`lib.trainers`: thin MONAI Label tasks over :mod:`lib.model`;
* :mod:`lib.activelearning`: scoring, strategies, model watcher, retraining;
* :mod:`lib.server`: what sits between uvicorn and MONAI Label's endpoints.

Tools that are not server code (phantoms, active-learning campaigns, PACS loading) live in the
``pants_tools`` package beside ``apps/``; nothing here imports them.
"""
