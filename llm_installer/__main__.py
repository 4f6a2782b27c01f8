from llm_installer.cli import main

if __name__ == "__main__":
    main()
