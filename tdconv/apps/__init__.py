"""The applications built on the library: data sets, training, the seed's experiment.

Nothing of the library imports this package. Its modules are imported one by one where they are
needed, so that ``import tdconv.apps`` costs nothing and ``tdconv info`` never loads the training
stack.
"""
