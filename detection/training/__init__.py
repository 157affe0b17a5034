"""Training, the paper's stage after feature extraction (one module per step):

* :mod:`.samples`: what the trainers read (:class:`~.samples.ImageSample`, the
  :class:`~.samples.FeatureSource` protocol), sample checks, the norm-20 feature scale;
* :mod:`.svm`: one linear SVM (settings, liblinear fit, objective, memory bound);
* :mod:`.hard_negatives`: one SVM per class by hard-negative mining (:func:`~.hard_negatives.train_svms`);
* :mod:`.bbox_regression`: box-regression samples and per-class regressors
  (:func:`~.bbox_regression.train_box_regressors`), solved by :mod:`.ridge`;
* :mod:`.calibration`: the score calibration, cross-fitted Platt scaling through the detector's
  own post-processing (:func:`~.calibration.fit_calibration`);
* :mod:`.detector_training`: the train stage, (fc fine-tuning) -> SVMs -> box regressors ->
  score calibration (:func:`~.detector_training.train_detector`), its settings
  (:class:`~.detector_training.TrainConfig`, the pipeline's ``train.*``), its memory check and
  checkpoints;
* :mod:`.from_features`: the same from a ``tools/extract_features.py`` folder (``tools/train_svm.py``).

The trained models the detector applies are in :mod:`detection.linear`. This package imports
none of its modules here, so importing one step does not load the others.
"""
