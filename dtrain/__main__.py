from dtrain.cli import main

main()
