// expect: CheckpointEvery<k>: k must be at least 1
#include <alloy/train/policies.hpp>
int main() { return alloy::CheckpointEvery<0>::every; }
