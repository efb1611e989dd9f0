"""Tools around the zoo: weights maintenance (download, verify, convert, pin), `snzoo info`'s description,
throughput benchmarks and figures. Each module is imported on its own (`from snzoo.tools.plot import ...`),
so that using one does not import the others' dependencies (matplotlib, for instance)."""
