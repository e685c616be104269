"""Hand-crafted + CNN hybrid features: HOG and LBP (texture.py) beside the trained model's embedding, extracted
through tf.data (extract.py), with a scikit-learn classifier per label chosen on val and scored on test
(classify.py)."""
