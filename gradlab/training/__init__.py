"""Training: the loop behind ``gradlab train``, its callbacks, experiment files, and rebuilding a
trained model from its run folder."""
