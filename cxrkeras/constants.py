"""Names shared by the CLI, the config, the data and the models: split names, stages and every choice list."""

SPLITS = ("train", "val", "test")  # the splits build-records writes, in this order
STAGES = (1, 2)  # 1: images with a finding, BCE; 2: all images, focal loss

PREPROCESSING = ("torch", "caffe")  # input normalisation: ImageNet mean/std RGB, or keras.applications' plain VGG16
EQUALIZE = ("hist", "clahe")  # contrast equalisation of the stored images (None: off)
CHANNELS = (1, 3)  # records: grayscale or RGB
RECORD_FORMATS = ("auto", "nih", "generic", "dicom")  # build-records --format
VERIFY_MODES = ("sha256", "size")  # how shards are checked against manifest.json before reading
FILL_MODES = ("reflect", "nearest", "constant")  # augmentation: pixels outside the image
PATIENT_SEXES = ("M", "F")  # patient features: sex one-hot order
PATIENT_VIEWS = ("PA", "AP")  # patient features: view-position one-hot order
PATIENT_MISSING = ("error", "encode")  # an unknown age/sex/view: an error naming the field, or the documented encoding
ATTENTION = ("none", "a", "b")  # DenseNet121's "learn to pay attention" gates: none, att-A, att-B

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "cosine", "constant", "one_cycle")
EPS_STYLES = ("keras", "fastai")  # Adam's epsilon: added to sqrt(v) (Keras) or to sqrt(v_hat) (fastai, PyTorch)
RECIPES = ("fit", "fine_tune")  # train.recipe: one schedule over all epochs, or fastai's fine_tune phases
MONITORS = ("val_auc_mean", "val_loss")  # what picks best.keras and drives early stopping / plateau
LOSSES = ("bce", "focal")  # loss.kind (default: bce in stage 1, focal in stage 2)
LR_SUGGESTIONS = ("valley", "steep")  # the LR finder's suggestion rules (fastai's)
MIXED_PRECISION = ("auto", "on", "off")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")

THRESHOLD_METHODS = ("youden", "f1")  # thresholds chosen on validation
HEATMAP_METHODS = ("gradcam", "gradcam++")
