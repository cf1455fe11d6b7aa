"""Policy stages. One module (or small package) per stage; see gateway/chain.py for the contract."""
