from chatvault_cli.main import main

main()
