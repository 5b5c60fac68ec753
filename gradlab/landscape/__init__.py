"""Loss landscapes, optimizer trajectories on 2-D test functions, simplexes and mode connectivity.

* :mod:`~gradlab.landscape.directions`: filter-normalised random, PCA, Hessian-eigenvector and
  interpolation directions in weight space (Li et al. 2018; Goodfellow et al. 2015).
* :mod:`~gradlab.landscape.grid`: loss/accuracy on a grid around the weights, without copying the
  model; :mod:`~gradlab.landscape.probe` picks the directions for ``gradlab probe landscape``.
* :mod:`~gradlab.landscape.functions` and :mod:`~gradlab.landscape.trajectories`: 2-D test
  functions as modules and the ``gradlab optimize`` core.
* :mod:`~gradlab.landscape.simplex` (Benton et al. 2021) and :mod:`~gradlab.landscape.connect`
  (Garipov et al. 2018), on the helpers of :mod:`~gradlab.landscape.functional`.
* :mod:`~gradlab.landscape.plots`: the figures.

Submodules are imported on use; importing this package loads nothing heavy.
"""
