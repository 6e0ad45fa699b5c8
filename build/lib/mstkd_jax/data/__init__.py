"""Data: BraTS / FeTS case folders -> checked, preprocessed, cached -> grain batches.

Modules: ``layouts`` (case discovery, label conventions), ``preprocess`` (reading and checking
NIfTI files, scaling, resampling, the box around the brain and its inverse), ``cache``
(memory-mappable preprocessed arrays), ``augment`` (training augmentation), ``pipeline``
(the API the trainer and the evaluator use), ``synthetic``, ``check`` and ``prepare``
(command-line tools). See docs/data.md. Nothing here imports models or training code.
"""
