// expect: Block must be 256 or 2048
#include <alloy/optim/state.hpp>
using S = alloy::State<alloy::q8_blockwise<1000>>;
int main() { return S::quant_block; }
