"""roadseg: FCN-8 on VGG16 for road-scene segmentation, in TensorFlow 1.x style (tf.compat.v1).

One module per concept:

============================  =====================================================
``roadseg.errors``            ``UserError``: one line naming the file and the fix
``roadseg.schemes``           class schemes: classes, colours, dataset label maps
``roadseg.datasets``          dataset layouts on disk, reading images and labels
``roadseg.input_pipeline``    tf.data batches: decode, resize, augment
``roadseg.vgg``               getting VGG16 as the course SavedModel
``roadseg.fcn``               the course API: load_vgg, layers, optimize, train_nn
``roadseg.inference``         the inference head and predictors (runs and exports)
``roadseg.trainer``           training runs: checkpoints, resume, validation
``roadseg.metrics``           confusion matrix, IoU, evaluation of a predictor
``roadseg.cityscapes_eval``   Cityscapes labelIds export and the official evaluator
``roadseg.outputs``           overlays, class-map PNGs, video, run folders
``roadseg.course``            the course's / seed's helper functions (``helper.py``)
``roadseg.demo_scenes``       procedurally drawn demo street scenes
``roadseg.demo``              the embedded default, end to end
``roadseg.cli``               the command line (``segment.py``)
============================  =====================================================
"""
__version__ = "2.0.0"
