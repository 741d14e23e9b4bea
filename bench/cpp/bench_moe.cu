#include "harness.h"
int main(int argc, char** argv) { return inferops::bench::bench_main(argc, argv, "bench_moe", "", {}); }
