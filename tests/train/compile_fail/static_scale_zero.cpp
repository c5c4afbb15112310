// expect: StaticLossScale<S>: S must be positive
#include <alloy/precision/loss_scale.hpp>
int main() { return alloy::StaticLossScale<0.0f>::dynamic; }
