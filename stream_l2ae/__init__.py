"""stream_l2ae: unsupervised anomaly detection with l2-normalized deep auto-encoder representations.

The method follows Aytekin et al. (2018): an auto-encoder whose embedding is l2-normalized during
training, k-means on the unit embeddings, and the anomaly score ``1 - max_j cos(z, c_j)``.
"""

__version__ = "0.1.0"
